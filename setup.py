"""ament_python package: builds with `colcon build` in a ROS 2 workspace and with `pip install .` in a venv."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "geodiff_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.xml")),
        (f"share/{PACKAGE}/rviz", glob("rviz/*.rviz")),
    ],
    install_requires=["setuptools"],
    # colcon runs pytest (not unittest) only for packages that declare it as a test dependency.
    extras_require={"test": ["pytest"]},
    zip_safe=True,
    maintainer="geodiff_ros maintainers",
    maintainer_email="geodiff-ros@example.org",
    description="Single-step diffusion depth, normals and metric point clouds from one camera (E2E-FT) for ROS 2",
    license="Apache-2.0",
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            "geodiff_node = geodiff_ros.ros.process:main",
            "geodiff_predict = geodiff_ros.cli.predict:main",
            "geodiff_compile = geodiff_ros.cli.compile:main",
            "geodiff_demo = geodiff_ros.cli.demo:main",
            "geodiff_bag = geodiff_ros.bag.cli:main",
            "geodiff_train = geodiff_ros.training.train:main",
            "geodiff_eval = geodiff_ros.evaluation.evaluate:main",
        ],
    },
)
